"""End-to-end pipelines per task (installed as lsquant.recipes)."""
