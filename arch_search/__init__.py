"""Hardware-in-the-loop architecture search for LFM2-style hybrid backbones."""
