"""Output series templates (YAML data, see README.md); a package only so that wheels ship them."""
