"""Synthetic captioned videos, the bundled model's recipe, and the demo."""
