"""From a prompt to a PNG: options, prompts, the pipeline, img2img and inpainting,
interpolation, and the parameters recorded inside each PNG."""
