#!/usr/bin/env bash
# SLURM and munge from the distribution (Debian/Ubuntu: slurm-wlm, munge), for local-cluster.sh and the tests'
# 2-node cluster on one machine. Does nothing when slurmctld, slurmd and munged are already installed.
set -euo pipefail
if command -v slurmctld > /dev/null && command -v slurmd > /dev/null && command -v munged > /dev/null; then exit 0; fi
command -v apt-get > /dev/null || { echo "install.sh: no apt-get; install SLURM (slurmctld, slurmd) and munge" >&2; exit 2; }
sudo=(); (( EUID == 0 )) || sudo=(sudo)
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq slurm-wlm munge > /dev/null
