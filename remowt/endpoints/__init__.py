"""The services an agent offers, and the ones the user side serves back."""
