"""``latentkit explain``: pictures of what happens inside a model, with the numbers behind them.

Each kind is one module that computes its numbers with the library's own pieces (the U-Net's
``capture_cross_attention``, ``generate()``'s per-step states, the VAE's posterior, the text
encoder's hidden states) and returns plain arrays; ``figures`` draws them with PIL only, and
``cli`` writes one PNG per command (plus ``--json`` with the numbers).

- ``attention``: DAAM-style heat maps per prompt token (Tang et al. 2022).
- ``localisation``: how well those maps find the drawn object, on the shapes world.
- ``guidance``: one seed at several guidance scales, read back by the shapes judge.
- ``embeddings``: a word's static embedding and its contextual state layer by layer.
- ``steps``: the trajectory: latents, predicted clean image and predicted noise per step.
- ``vae``: encode, decode, sample around the posterior, interpolate, latent statistics.

The package sits between ``server`` and ``shapes`` in the layering contract: it uses the
shapes world's judge, and nothing below it imports it.
"""
