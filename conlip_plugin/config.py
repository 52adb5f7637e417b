"""Former path of ``conlip_plugin.method.config``, kept for users' imports: the same module object."""
import sys

from conlip_plugin.method import config as _module

sys.modules[__name__] = _module
