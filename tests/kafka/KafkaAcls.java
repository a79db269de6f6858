// Grants and lists ACLs on a test broker through Kafka's own Admin client, for the acceptance
// test `kafka_acl.rs`. The jars `tests/services` caches hold the broker and the client but not
// the `kafka-acls` tool (it lives in kafka-tools), so the test runs this file with Java's
// source launcher instead:
//
//   java -cp '<kafka libs>/*' tests/kafka/KafkaAcls.java <bootstrap> <user> <password> \
//       allow <principal> <topic|group|cluster> <name> <OPERATION[,OPERATION…]> [allow …]
//
// <user> authenticates with SCRAM-SHA-256 over SASL_PLAINTEXT and must be a super user. Each
// `allow` adds ALLOW ACLs for the literal resource, from any host (what
// `kafka-acls --add --allow-principal <principal> --operation <OP> --topic|--group <name>` does).
// Afterwards every ACL of the cluster is printed, one a line.

import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class KafkaAcls {
    public static void main(String[] args) throws Exception {
        if (args.length < 3 || (args.length - 3) % 5 != 0) {
            System.err.println(
                "usage: KafkaAcls <bootstrap> <user> <password> [allow <principal> <topic|group|cluster> <name> <OPS>]...");
            System.exit(2);
        }
        Properties config = new Properties();
        config.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        config.put("security.protocol", "SASL_PLAINTEXT");
        config.put("sasl.mechanism", "SCRAM-SHA-256");
        config.put("sasl.jaas.config",
            "org.apache.kafka.common.security.scram.ScramLoginModule required username=\""
                + args[1] + "\" password=\"" + args[2] + "\";");
        List<AclBinding> bindings = new ArrayList<>();
        for (int i = 3; i < args.length; i += 5) {
            if (!args[i].equals("allow")) {
                throw new IllegalArgumentException("expected `allow`, found " + args[i]);
            }
            String principal = args[i + 1];
            ResourceType type = switch (args[i + 2]) {
                case "topic" -> ResourceType.TOPIC;
                case "group" -> ResourceType.GROUP;
                case "cluster" -> ResourceType.CLUSTER;
                default -> throw new IllegalArgumentException("unknown resource type " + args[i + 2]);
            };
            ResourcePattern resource = new ResourcePattern(type, args[i + 3], PatternType.LITERAL);
            for (String operation : args[i + 4].split(",")) {
                bindings.add(new AclBinding(resource, new AccessControlEntry(
                    principal, "*", AclOperation.fromString(operation), AclPermissionType.ALLOW)));
            }
        }
        try (Admin admin = Admin.create(config)) {
            if (!bindings.isEmpty()) {
                admin.createAcls(bindings).all().get(60, TimeUnit.SECONDS);
            }
            for (AclBinding acl : admin.describeAcls(AclBindingFilter.ANY).values().get(60, TimeUnit.SECONDS)) {
                System.out.println(acl.entry().principal() + " " + acl.entry().permissionType() + " "
                    + acl.entry().operation() + " " + acl.pattern().resourceType() + ":"
                    + acl.pattern().name());
            }
        }
    }
}
