"""Build a tiny Gemma 4 BnB checkpoint offline, serve it with vLLM's OpenAI server and
print the answer to an image+text request.

    .venv/bin/python scripts/demo.py [--variant gemma4-nf4-dq]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="gemma4-nf4-dq")
    args = parser.parse_args()

    from openai import OpenAI

    from build_tiny_checkpoints import build
    from engines import openai_server
    from parity import load_reference

    ckpt = build([args.variant])[args.variant]
    case = next(c for c in load_reference(ckpt)["cases"] if c["name"] == "image-red")
    print(f"serving {ckpt} with --load-format bitsandbytes …", flush=True)
    with openai_server(str(ckpt)) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="-")
        reply = client.chat.completions.create(
            model=str(ckpt), messages=case["messages"], max_tokens=16, temperature=0.0
        )
    print("request : [red 64x48 PNG] + 'What color is this?'")
    print("answer  :", repr(reply.choices[0].message.content))
    print("(a random tiny model: the words are noise, the pipeline is real)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
