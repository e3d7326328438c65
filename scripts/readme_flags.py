"""Rewrite the flag tables of README.md from the CLI's parser (fasttrdpo.cli.readme_flags).

    .venv/bin/python scripts/readme_flags.py           # rewrite README.md in place
    .venv/bin/python scripts/readme_flags.py --check   # exit 1 if README.md is out of date

tests/test_cli_flags.py fails while the README's tables differ from the parser's flags, so run this after
adding a TRDPOConfig field (or changing a flag's help).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fasttrdpo.cli import README_FLAGS_BEGIN, README_FLAGS_END, readme_flags  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def updated(text: str) -> str:
    start, end = text.find(README_FLAGS_BEGIN), text.find(README_FLAGS_END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md lacks the markers {README_FLAGS_BEGIN!r} ... {README_FLAGS_END!r}")
    return text[:start] + readme_flags() + text[end + len(README_FLAGS_END):]


if __name__ == "__main__":
    with open(README) as f:
        current = f.read()
    new = updated(current)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if new == current else 1)
    if new != current:
        with open(README, "w") as f:
            f.write(new)
    print("README.md flags " + ("rewritten" if new != current else "already up to date"))
