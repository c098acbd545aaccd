"""Wire-protocol adapters: pure codecs (``sse``, ``wire``, ``openai``, ``anthropic``, ``mcp``)
and the front doors built on them.

Import the module you need (``from bastion.adapters.openai import OpenAIChatCodec``);
this package imports nothing eagerly so that loading one codec stays cheap.
"""
