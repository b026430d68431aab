"""Process entry points: one module per role, each a thin loop over pipeline/."""
