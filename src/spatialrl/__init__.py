"""spatialrl: filtered GRPO for FLUX against the SpatialScore spatial reward model.

The core (this package minus `actors` and `learners`) never imports Ray.
"""

__version__ = "0.1.0"
