"""tiny-llava end to end: capture the language decoder, calibrate on image-text data, compress, and
score multiple-choice image questions uncompressed and compressed.

    python examples/vlm_llava.py [--model PATH] [--recipe wsvd-noq] [--rho1 0.6] [--data data.jsonl]
"""

from vlm_common import run

if __name__ == "__main__":
    run("tiny-llava")
