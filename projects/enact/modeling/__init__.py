"""Model code of the ENACT project.  Importing this package needs torch only; the detectors
(which need detectron2) are imported from their own modules."""
from .act import ActAttention, number_act_layers
from .attention import ATTENTION_BACKENDS, MultiheadAttention, multi_head_attention
from .enact import CLUSTERING_MODES, ClusterOutput, EnactAttention, EnactClustering
