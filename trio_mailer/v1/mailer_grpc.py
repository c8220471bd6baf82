import purerpc
import trio_mailer.v1.mailer_pb2 as trio_mailer_dot_v1_dot_mailer__pb2
import google.protobuf.timestamp_pb2 as google_dot_protobuf_dot_timestamp__pb2


class MailerServicer(purerpc.Servicer):
    async def Send(self, input_message):
        raise NotImplementedError()

    async def SendPass(self, input_message):
        raise NotImplementedError()

    async def SendRetrieve(self, input_message):
        raise NotImplementedError()

    async def GetStatus(self, input_message):
        raise NotImplementedError()

    async def WatchStatus(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "trio_mailer.v1.Mailer"
        )
        service_obj.add_method(
            "Send",
            self.Send,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.SendRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgReply,
            )
        )
        service_obj.add_method(
            "SendPass",
            self.SendPass,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgReply,
            )
        )
        service_obj.add_method(
            "SendRetrieve",
            self.SendRetrieve,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgReply,
            )
        )
        service_obj.add_method(
            "GetStatus",
            self.GetStatus,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.StatusRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MailStatus,
            )
        )
        service_obj.add_method(
            "WatchStatus",
            self.WatchStatus,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                trio_mailer_dot_v1_dot_mailer__pb2.StatusRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MailStatus,
            )
        )
        return service_obj


class MailerStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "trio_mailer.v1.Mailer",
            channel
        )
        self.Send = self._client.get_method_stub(
            "Send",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.SendRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgReply,
            )
        )
        self.SendPass = self._client.get_method_stub(
            "SendPass",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgReply,
            )
        )
        self.SendRetrieve = self._client.get_method_stub(
            "SendRetrieve",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MsgReply,
            )
        )
        self.GetStatus = self._client.get_method_stub(
            "GetStatus",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.StatusRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MailStatus,
            )
        )
        self.WatchStatus = self._client.get_method_stub(
            "WatchStatus",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                trio_mailer_dot_v1_dot_mailer__pb2.StatusRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.MailStatus,
            )
        )


class MailerAdminServicer(purerpc.Servicer):
    async def ListSuppressed(self, input_message):
        raise NotImplementedError()

    async def RemoveSuppressed(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "trio_mailer.v1.MailerAdmin"
        )
        service_obj.add_method(
            "ListSuppressed",
            self.ListSuppressed,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.ListSuppressedRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.ListSuppressedReply,
            )
        )
        service_obj.add_method(
            "RemoveSuppressed",
            self.RemoveSuppressed,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.RemoveSuppressedRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.RemoveSuppressedReply,
            )
        )
        return service_obj


class MailerAdminStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "trio_mailer.v1.MailerAdmin",
            channel
        )
        self.ListSuppressed = self._client.get_method_stub(
            "ListSuppressed",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.ListSuppressedRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.ListSuppressedReply,
            )
        )
        self.RemoveSuppressed = self._client.get_method_stub(
            "RemoveSuppressed",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                trio_mailer_dot_v1_dot_mailer__pb2.RemoveSuppressedRequest,
                trio_mailer_dot_v1_dot_mailer__pb2.RemoveSuppressedReply,
            )
        )