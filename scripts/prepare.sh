#!/usr/bin/env bash
# Download an HF checkpoint and convert it: scripts/prepare.sh ORG/NAME [HF_TOKEN]
set -euo pipefail
cd "$(dirname "$0")/.."
repo_id=${1:?usage: scripts/prepare.sh ORG/NAME [HF_TOKEN]}
python scripts/download.py --repo_id "$repo_id" ${2:+--hf_token "$2"}
python scripts/convert_hf_checkpoint.py --checkpoint_dir "checkpoints/$repo_id"
