"""Training data: sources (folders, tar shards), decoding, buckets, order, the loader,
the latent cache and the bad-sample log."""
