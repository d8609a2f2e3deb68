# Training settings shared by every config; the model configs set max_iter and output_dir.
train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=90000,
    device="cuda",
    seed=42,
    amp=dict(enabled=False, dtype="float16"),  # bfloat16 is used instead on CPU
    clip_max_norm=0.1,  # gradient clipping by global norm, as DETR
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=3),
    eval_period=5000,
    log_period=20,
    cudnn_benchmark=False,
)
