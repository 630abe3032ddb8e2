"""Tools: processes built from nodes (sal-ros run, replay, the online evaluation, parameter docs)."""
