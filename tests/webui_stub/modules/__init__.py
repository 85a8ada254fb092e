"""Stand-in of A1111's ``modules`` package for the glue tests (see ../README.md)."""
