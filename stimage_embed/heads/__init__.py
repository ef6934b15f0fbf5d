"""The expression heads under their documented import name: ``from stimage_embed.heads
import NBRegressor, save_head, load_head``.

The heads live in the top-level ``heads`` package (arrays in, arrays out; it never imports
``stimage_embed``); this module re-exports its public API, the same objects, so
``stimage_embed.heads.NBRegressor is heads.NBRegressor``. No model maths here.
"""

from heads import *  # noqa: F403 - the re-export is the point
from heads import __all__  # noqa: F401
