"""Phase 5 writers: tables, figures, image grids, frequency analysis, statistics and the privacy audit."""
