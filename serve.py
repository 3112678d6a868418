"""
The web chat and the OpenAI-compatible API: not written yet.

DESIGN.md places the http.server layer here, over sampler.py; until it lands this entry point only
says so. Chat in the terminal with `python tinychat.py` meanwhile.

Left out on purpose:
- everything, for now: the HTTP server is the next piece of work

Examples:
    python serve.py
"""
import sys


def main():
    sys.exit("serve: the web server is not written yet; chat in the terminal with 'python tinychat.py'")


if __name__ == "__main__":
    main()
