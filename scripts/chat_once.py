"""Wait for an OpenAI-compatible server on localhost, ask it one chat question, print the answer.

.venv/bin/python scripts/chat_once.py --port 8000 --question "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import sys

from tsq_vllm.serve.process import wait_healthy


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--port", type=int, default=8000, help="server port on 127.0.0.1")
    p.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for the server to start"
    )
    args = p.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(base, args.timeout, poll=2)
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None

    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.question}],
        max_tokens=args.max_tokens,
        temperature=0,
    )
    sys.stdout.write(f"Q: {args.question}\nA: {reply.choices[0].message.content.strip()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
