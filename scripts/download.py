"""Download an HF checkpoint (weights, config and tokenizer files) into checkpoints/ORG/NAME.

    python scripts/download.py --repo_id meta-llama/Llama-2-7b-hf [--hf_token TOKEN]

Needs network access to the Hugging Face hub; the tests never call it.
"""
import argparse
import sys
from pathlib import Path

PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def download(repo_id: str, out_dir: Path, token: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    target = out_dir / repo_id
    target.mkdir(parents=True, exist_ok=True)
    # prefer safetensors; fall back to pytorch_model*.bin only for repositories that have nothing else
    snapshot_download(repo_id, local_dir=target, allow_patterns=PATTERNS, token=token)
    if not list(target.glob("*.safetensors")):
        snapshot_download(repo_id, local_dir=target, allow_patterns=["pytorch_model*.bin"], token=token)
    return target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo_id", required=True, help="ORG/NAME on the Hugging Face hub")
    p.add_argument("--hf_token", default=None, help="access token for gated models (or set HF_TOKEN)")
    p.add_argument("--out_dir", type=Path, default=Path("checkpoints"))
    args = p.parse_args(argv)
    try:
        print(download(args.repo_id, args.out_dir, args.hf_token))
    except Exception as e:  # network, authentication, unknown repository: one line is enough
        print(f"error: cannot download {args.repo_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
