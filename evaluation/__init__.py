"""Offline evaluation that sits on top of both layers: the feed policy served by serving/'s own code on a
bundle that training/ wrote. Neither training/ nor serving/ imports it."""
