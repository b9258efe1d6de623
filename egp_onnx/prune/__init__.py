"""The budget and masks (pure numpy), how far each layer may go, and the EGP loop that steps through them."""
