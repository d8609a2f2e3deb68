#!/usr/bin/env python
"""Memory and time of whole detectors with and without ENACT (the paper's Table 1).

For every config (default: DETR R50, Conditional DETR R50 and Anchor DETR R50-DC5, each with and
without ENACT) and identical synthetic batches, measures

  train     one full training step: forward, loss, backward, gradient clipping (the config's
            train.clip_max_norm) and the config's optimizer step (AdamW)
  infer     one inference call in eval mode under torch.no_grad()
  encoder   forward + backward of ``model.transformer.encoder`` alone, on the inputs it receives
            inside the model (captured with a forward pre-hook: real feature-map shapes, masks and
            position encodings), train mode
  clusters  for ENACT models, the clusters per image of every encoder layer (eval-mode forward
            on the first batch, initial weights) and their mean over the layers

Batches: ``--batch`` images (default: the config's dataloader.train.total_batch_size, i.e. 8, and
4 for Anchor DETR, as in the paper) padded to ``--size H W`` (default 800 x 1333): image 0 is
exactly H x W, the others have random sides in [min-scale, 1] x (H, W) (so the batch carries
DETR's bottom / right padding), random uint8 pixels and 1..max-boxes random ground-truth boxes.
``--orientation mixed`` turns every odd image portrait (image 1 exactly W x H), so the batch pads
to max(H, W) squared: with the default size, 1333 x 1333 — what a COCO batch pads to when it
holds a landscape and a portrait image at the largest training scale, the batch that sets a
training run's peak memory.  Everything is seeded; every variant sees the same batch.

Time: the baseline and the ENACT variant of one detector live in one process, and their steps are
interleaved (train, infer, encoder for each variant, ``--repeats`` times after one warm-up);
the median is reported, per image (s/img, encoder ms/img).
Memory: one fresh process per (config, mode) after a warm-up step of the same mode and size.
On CUDA the peak of torch.cuda.max_memory_allocated during the measured step (weights,
gradients and optimizer state included, as the paper's GPU memory); on CPU the increase of the
peak RSS (VmHWM, reset before the step) over the RSS just before it (activations, gradients and
temporaries; weights and AdamW state are already resident), with glibc's mmap threshold pinned
(MALLOC_MMAP_THRESHOLD_) so that freed buffers leave the RSS.  ``--jobs N`` runs N memory
workers side by side (each measures only its own process; timing never overlaps them).
``--attention`` sets the backend ("sdpa" or "eager") of every encoder attention module that has
one, on both sides; encoders without such a module (Anchor DETR's RCDA) are labelled "rcda".
Dropout: on CPU, PyTorch's ``F.dropout`` keeps a float32 mask for backward where CUDA keeps a
1-byte one, which inflates every dropout's memory on CPU, most of all eager attention's (B, h, N, N)
dropout.  ``--dropout-mask bool`` runs every ``F.dropout`` as ``torch.native_dropout`` (the same
function, a bool mask), so that a CPU run stores what a GPU run stores; the default ``native``
leaves PyTorch's behaviour alone.

    python tools/benchmark.py                                          # the paper's sizes
    python tools/benchmark.py --batch 2 --size 512 768 --repeats 2     # a quick CPU run
    python tools/benchmark.py --device cuda --attention both
    python tools/benchmark.py --configs configs/shapes/detr_r18_shapes.py \\
        configs/shapes/detr_r18_shapes_enact.py --batch 1 --size 64 96 --opts model.num_queries=10

Profile: ``--profile DIR`` runs, after the timing, one more step of every (variant, mode) under
torch.profiler and writes its op table (sorted by self time) to DIR/<config>_<attention>_<mode>.txt;
the JSON and the Markdown get the time of the labelled ranges (``enact::cluster_keys_values``,
``enact::attend_clusters``, ``mhsa::attend_heads`` — every MultiheadAttention, the decoder's too:
forward, summed over the layers) and of the costliest backward functions, as a share of the
step's profiled op time.

Writes a Markdown table (``--out-md``, default output/benchmark.md) and the raw numbers
(``--out-json``, default output/benchmark.json).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from projects.enact.benchmark.detector import parse_args, run  # noqa: E402  (the logic of this tool)


def main():
    """Parse the command line (this docstring is its --help) and run the benchmark."""
    run(parse_args(description=__doc__))


if __name__ == "__main__":
    main()
