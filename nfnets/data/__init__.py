"""Input data: sources, the reference's image transforms, and the grain pipelines."""
from nfnets.data.ops_image import eval_image

__all__ = ['eval_image']
