"""Former path of ``conlip_plugin.method.model``, kept for users' imports: the same module object."""
import sys

from conlip_plugin.method import model as _module

sys.modules[__name__] = _module
