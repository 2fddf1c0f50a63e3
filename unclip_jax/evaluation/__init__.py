"""Evaluation: retrieval with CLIP, Frechet distances, CLIP score, sharded runners."""
