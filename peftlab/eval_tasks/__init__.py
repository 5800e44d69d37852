"""lm-eval task YAMLs shipped with peftlab (``peftlab evaluate --tasks peftlab_...``) and their data."""
