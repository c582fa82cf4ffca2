"""Typed keys of the aiohttp application: how a route handler finds a component."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from boincd_containers.daemon.app import Daemon
    from boincd_containers.gc.collector import Collector
    from boincd_containers.gc.inventory import Inventory

# The types are for mypy: aiohttp uses the second argument only in repr().
DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")
INVENTORY: web.AppKey[Inventory] = web.AppKey("inventory")
COLLECTOR: web.AppKey[Collector] = web.AppKey("gc")
