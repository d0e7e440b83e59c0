"""Phases 3-4 over the grid: one record per (method, ipc, pipc, seed) cell, resume, the worker processes
(cell_pool), failed cells, loss traces."""
