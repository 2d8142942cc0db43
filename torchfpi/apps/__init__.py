"""Applications of torchfpi on real data: multi-label classification, denoising, optical flow.

Each application is one importable module driven by the ``torchfpi`` CLI. Applications depend on
the library, never the reverse. Their third-party needs are the ``torchfpi[apps]`` extra.
"""
