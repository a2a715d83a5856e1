"""Kassa: a real-time decision engine for checkout and the order-confirmation page."""

__version__ = "0.1.0"
