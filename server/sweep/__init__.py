"""Phases 3-4 over the grid: one record per (method, ipc, pipc, seed) cell, resume, failed cells, loss traces."""
