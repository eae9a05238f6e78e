#!/usr/bin/env python3
"""PyTorch baseline for `unet_forward.rs`: the same UNet configuration (diffusers
UNet2DConditionModel, random weights, f32), the same latent size, forward only, under
torch.no_grad(), on the CPU with as many threads as the machine has cores.

    python3 crates/models/examples/unet_forward_torch.py sd15 [runs]
    python3 crates/models/examples/unet_forward_torch.py tiny [runs]
"""

import os
import resource
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

CONFIGS = {
    # SD1.5's config.json values.
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    # slider-worker's UNetConfig::tiny().
    "tiny": dict(
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=4,
    ),
}


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(os.cpu_count())
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **CONFIGS[which]).eval()
    sample = torch.randn(1, 4, 64, 64)
    context = torch.randn(1, 77, 768)
    t = torch.tensor([500.0])
    times = []
    with torch.no_grad():
        for i in range(runs + 1):
            start = time.perf_counter()
            out = unet(sample, t, context).sample
            float(out.sum())
            secs = time.perf_counter() - start
            if i > 0:
                times.append(secs)
            print(f"run {i}: {secs:.3f} s", file=sys.stderr)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{which} UNet forward (PyTorch {torch.__version__}, {torch.get_num_threads()} threads), "
        f"1x4x64x64 latents: median {statistics.median(times):.3f} s over {runs} runs, peak RSS {peak:.0f} MiB"
    )


if __name__ == "__main__":
    main()
