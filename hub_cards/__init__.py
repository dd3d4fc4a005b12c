"""Model-card templates for rotation bundles pushed to the Hub (Jinja, rendered by `huggingface_hub.ModelCard`)."""
