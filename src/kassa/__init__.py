"""Kassa: a real-time decision engine for checkout and the order-confirmation page."""

__version__ = "0.2.0"
