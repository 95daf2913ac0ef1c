"""Results out: the artifact directory (save, reload by replaying the passes), packed tensor layouts, the report."""
