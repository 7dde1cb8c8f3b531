"""Whole models built from lsquant layers, and converters to and from Hugging Face models."""
