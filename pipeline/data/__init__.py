"""Data sources and formats: dataset specs and raw readers, bring-your-own sources, the clean shard folders."""
