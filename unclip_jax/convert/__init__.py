"""Importers for published weights (Hugging Face CLIP, Karlo in diffusers layout)."""
