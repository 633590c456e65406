"""Where and how the networks run: device and dtype, the memory estimate, the speed
layout (channels-last, packed weights) and tiled decoding."""
