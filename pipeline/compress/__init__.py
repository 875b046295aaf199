"""Compression: knowledge distillation and what it costs and keeps."""
