"""Config modules, one per resolution and kernel variant; load them with `retina.model.config.load`."""
