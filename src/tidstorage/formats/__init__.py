"""File formats: FileStorage scanning and cuts, the TID log, blob directories."""
