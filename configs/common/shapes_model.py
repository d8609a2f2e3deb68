# The small from-scratch model of the shapes demos, applied to a detector's model config:
# R18 with trainable BatchNorm (no pretrained weights exist here, and frozen BN would not train; BN
# with batch statistics learns this data several times faster than GroupNorm) up to res3
# (stride 8: ~14 x 18 tokens at the test size, where stride 16 would leave 7 x 9), d = 128,
# 3 + 3 layers, 8 heads, FFN 256, no dropout, 30 queries.  Compared with the paper's models
# (R50 to res5, d = 256, 6 + 6 layers, FFN 2048, 100-300 queries) everything is smaller so that a
# 2-core CPU trains it in minutes; the encoder and decoder layers are the same code.
from .shrink_model import shrink_model


def shrink_for_shapes(model, num_classes: int = 4, num_queries: int = 30):
    """``shrink_model`` with the demos' sizes (the loss weights keep the config's)."""
    return shrink_model(
        model,
        depth=18,
        norm="BN",
        freeze_at=0,
        in_features="res3",
        embed_dim=128,
        num_heads=8,
        num_encoder_layers=3,
        num_decoder_layers=3,
        ffn_dim=256,
        dropout=0.0,
        num_classes=num_classes,
        num_queries=num_queries,
        select_box_nums_for_evaluation=num_queries,
    )


def shapes_schedule(optimizer, train, max_iter: int, output_dir: str, lr: float = 4e-4):
    """AdamW at ``lr`` for every parameter (the backbone trains from scratch: no 0.1x), CPU,
    checkpoints every 500 iterations, one evaluation at the end."""
    optimizer.lr = lr
    optimizer.params.lr_factor_func = None
    train.device = "cpu"
    train.max_iter = max_iter
    train.checkpointer.period = 500
    train.eval_period = 0  # evaluate once, at the end
    train.log_period = 20
    train.output_dir = output_dir
