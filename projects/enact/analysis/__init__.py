"""What ENACT does inside a detector, for pictures and statistics.

``capture``  :func:`capture_enact`: records each ENACT layer's steps 1-5 (h, h~, s, clusters)
             during a forward pass through ``EnactClustering.register_trace_hook`` (torch only).
``stats``    per image and layer: clusters, N/M, cluster length, the information share inside
             ground-truth boxes vs their token share; summaries over a split (numpy only).
``runner``   config + checkpoint -> model, the test-time inputs (optionally resized), per image
             the predictions and layer maps on the feature grid (needs detectron2).
``plots``    the pictures (matplotlib, Agg) and index.html.

Tools: ``tools/visualize_enact.py`` (pictures) and ``tools/enact_stats.py`` (statistics).
"""
from .capture import EnactCapture, LayerTrace, capture_enact
from .stats import cell_centres, image_layer_stats, inside_boxes, summarize

__all__ = [
    "EnactCapture",
    "LayerTrace",
    "capture_enact",
    "cell_centres",
    "image_layer_stats",
    "inside_boxes",
    "summarize",
]
