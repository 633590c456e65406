"""Plain nn.Modules: the VAE, the CLIP towers, the tokenizer and the U-Net."""
